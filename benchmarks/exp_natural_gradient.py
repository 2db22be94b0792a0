"""Natural gradient vs Adam on MNIST-1D: steps and wall-clock to each target.

Methods, each with a grid of ``len(LRS[method])`` learning rates (the same size for all):

* ``adam`` / ``adamw``: ``torch.optim.Adam`` (MLP, CNN) / ``AdamW`` (weight decay 0.01,
  the transformer), default betas;
* ``kfac``: SGD with momentum 0.9 preconditioned by ``natgrad.FisherPreconditioner(model,
  kind="kfac", source="backward")`` with every other setting at its documented default.

Workloads (benchmarks/workloads.py): the MNIST-1D MLP and CNN (targets: full-train-set
loss <= 0.1, test accuracy >= 65% / 90%), and a 4-layer pre-LN transformer encoder (d=32)
on the MNIST-1D signal as a sequence of 10 tokens of 4 samples (target: train loss <= 0.5
on the first 1000 training samples, evaluated every 25 steps; its own fragment,
results/natural_gradient_transformer.md). Batch 100. ``--prune`` stops a phase-1 run once
it cannot be its seed's best lr (``--wall derived`` only needs the best).

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
import json
import math
import os
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
MAX_STEPS = {"mlp": 2000, "cnn": 2000, "transformer": 1500}
#: steps between evaluations (the transformer's forward is ~30x the MLP's, so less often)
EVAL_EVERY_OF = {"mlp": EVAL_EVERY, "cnn": EVAL_EVERY, "transformer": 25}
#: the train loss is measured on the first this many training samples (None: all 4000)
EVAL_TRAIN = {"mlp": None, "cnn": None, "transformer": 1000}


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


def signal_transformer() -> nn.Module:
    """The transformer workload: 4 layers, d=32, 4 heads (small enough for the 2-core
    machine's budget: 24 training runs)."""
    return SignalTransformer(d=32)


MODELS = {"mlp": mnist1d_mlp, "cnn": mnist1d_cnn, "transformer": signal_transformer}


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
        n_eval = EVAL_TRAIN[self.workload]
        _, loss = evaluate(self.model, data.x_train[:n_eval], data.y_train[:n_eval])
        acc = float("nan")
        if "acc" in TARGETS[self.workload]:
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
        run.advance(data, EVAL_EVERY_OF[workload])
    return (method, workload, lr, seed), {k: v[0] for k, v in run.hit.items()}, run.status


def pruned_order(lrs: tuple[float, ...]) -> list[float]:
    """The grid from its middle outwards (the likely best first)."""
    mid = (len(lrs) - 1) / 2
    return sorted(lrs, key=lambda lr: (abs(lrs.index(lr) - mid), -lrs.index(lr)))


def run_pruned(jobs: list[tuple], n_jobs: int, done: dict, on_result) -> None:
    """Phase 1 with pruning: a run's budget is capped at the fewest steps any finished run
    of the same method, workload and seed needed for every target, since a run needing
    more cannot be that seed's best lr. Runs go middle of the grid first."""
    from concurrent.futures import FIRST_COMPLETED, wait

    def cap(job: tuple) -> int:
        m, w, _, s, budget = job
        best = budget
        for (m2, w2, _, s2), (hit, _) in done.items():
            if (m2, w2, s2) == (m, w, s) and set(TARGETS[w]) <= set(hit):
                best = min(best, max(hit.values()))
        return best

    todo = sorted(jobs, key=lambda j: (j[1], j[3], j[0], pruned_order(LRS[j[0]]).index(j[2])))
    with ProcessPoolExecutor(n_jobs) as pool:
        running: set = set()
        while todo or running:
            while todo and len(running) < n_jobs:
                j = todo.pop(0)
                running.add(pool.submit(steps_job, (*j[:4], cap(j))))
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                key, hit, status = f.result()
                done[key] = (hit, status)
                on_result(key, hit, status)


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
    if args.steps_log and os.path.exists(args.steps_log):  # resume: finished phase-1 runs
        with open(args.steps_log) as fh:
            for line in fh:
                rec = json.loads(line)
                steps[tuple(rec["key"])] = (rec["hit"], rec["status"])
    todo = [j for j in jobs if tuple(j[:4]) not in steps]

    def record(key: tuple, hit: dict, status: str) -> None:
        print("steps", key, hit, status, flush=True)
        if args.steps_log:
            with open(args.steps_log, "a") as fh:
                fh.write(json.dumps({"key": list(key), "hit": hit, "status": status}) + "\n")

    t1 = time.time()
    if args.prune:
        run_pruned(todo, args.jobs, steps, record)
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            for key, hit, status in pool.map(steps_job, todo):
                steps[key] = (hit, status)
                record(key, hit, status)
    t1 = time.time() - t1
    if args.steps_only:
        print(f"phase 1 done in {t1:.0f} s; runs in {args.steps_log}")
        return ""
    if args.wall == "derived":
        return derived_report(args, data, steps, seeds, workloads, lrs, max_steps, t1)
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
    if workloads != ["mlp", "cnn"]:
        cmd += " --workloads " + " ".join(workloads)
    if args.prune:
        cmd += " --prune"
    from_log = ""
    if args.steps_log:  # phase 1 read back from a log (written by --steps-only or a run)
        cmd += " --steps-log LOG"
        from_log = (" (LOG: the phase-1 runs, read back and not re-run; "
                    "`--steps-only --steps-log LOG` writes it)")
    lines = [
        "## Natural gradient on MNIST-1D",
        "",
        machine_line(),
        "",
        f"Command: `{cmd}`{from_log}. {LOAD_NOTE}. Phase 1 (steps, one thread per run, "
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


def title(workloads: list[str]) -> str:
    """The fragment's heading."""
    if workloads == ["transformer"]:
        return "## Natural gradient: a transformer on MNIST-1D tokens"
    return "## Natural gradient on MNIST-1D"


def target_txt(workloads: list[str]) -> str:
    """The targets of the issue: <= 2/3 of Adam's wall-clock on the MLP and the CNN, ahead
    of AdamW (ratio < 1) on the transformer."""
    parts = []
    if {"mlp", "cnn"} & set(workloads):
        parts.append("wall ratio <= 0.67 on the MLP and the CNN")
    if "transformer" in workloads:
        parts.append("wall ratio < 1, ahead of AdamW, on the transformer")
    return "; ".join(parts)


def best_lr(steps, m, w, s, tgt, lrs):
    """The lr of ``m``'s grid with the fewest steps to ``tgt`` (seed ``s``), or None."""
    cands = [(steps[(m, w, lr, s)][0][tgt], lr) for lr in lrs[m] if tgt in steps[(m, w, lr, s)][0]]
    return min(cands)[1] if cands else None


def derived_report(args, data, steps, seeds, workloads, lrs, max_steps, t1) -> str:
    """``--wall derived``: wall-clock to a target = steps to it (phase 1) x the median
    time of one step (interleaved rounds, ``--threads`` threads)."""
    torch.set_num_threads(args.threads)
    t2 = time.time()
    rounds = 3 if args.quick else 15
    cost = {w: per_step_cost(w, data, [BASELINE[w], "kfac"], rounds, 10) for w in workloads}
    t2 = time.time() - t2
    cmd = "python -m benchmarks.exp_natural_gradient --wall derived" + (
        " --quick" if args.quick else "")
    if args.threads != 2:
        cmd += f" --threads {args.threads}"
    if workloads != ["mlp", "cnn"]:
        cmd += " --workloads " + " ".join(workloads)
    if args.prune:
        cmd += " --prune"
    if args.steps_log:
        cmd += " --steps-log LOG"
    if args.note:
        cmd += " --note NOTE"
    bases = sorted({BASELINE[w] for w in workloads})
    base_txt = {"adam": "`adam`: torch Adam", "adamw": "`adamw`: torch AdamW (weight decay 0.01)"}
    eval_txt = "; ".join(
        f"{w}: every {EVAL_EVERY_OF[w]} steps, train loss on "
        + ("all 4000 train samples" if EVAL_TRAIN[w] is None
           else f"the first {EVAL_TRAIN[w]} train samples")
        + (", test accuracy on the 1000 test samples" if "acc" in TARGETS[w] else "")
        for w in workloads)
    prune_txt = (" Pruned grid (`--prune`): a run stops once it has taken as many steps "
                 "as the best finished run of the same method and seed needed (it cannot "
                 "be that seed's best lr); runs go from the middle of the grid outwards, "
                 "so `—` in the per-lr table can mean stopped there." if args.prune else "")
    lines = [
        title(workloads),
        "",
        machine_line(),
        "",
        f"Command: `{cmd}`" + (" (LOG: phase-1 runs already finished, read back and "
                                "not re-run)" if args.steps_log else "") + ". "
        f"{LOAD_NOTE}. Phase 1 (steps, one thread per run, {args.jobs} runs at once): "
        f"{t1:.0f} s for the runs not in the log; per-step timing ({args.threads} torch "
        f"threads, {rounds} interleaved rounds of 10 steps per method): {t2:.0f} s.",
        "",
        "Setup: batch 100, 4000 train / 1000 test; evaluation (excluded from every clock) "
        f"{eval_txt}. `kfac`: SGD (momentum 0.9) + `FisherPreconditioner(model, "
        "kind=\"kfac\", source=\"backward\")`, every other setting its documented default "
        "(damping 1e-2, update_every 10, ema_decay 0.95, kl_clip 1e-3, with the SGD lr "
        "passed to `pre.step`). " + "; ".join(base_txt[b] for b in bases) + ". "
        "Learning-rate grids (4 points each): "
        + "; ".join(f"{m} {list(lrs[m])}" for m in lrs if m in (*bases, "kfac"))
        + f". Seeds {list(seeds)}. Per seed and target, each method's lr is the grid point "
        "with the fewest steps to the target. Wall-clock is DERIVED: steps to the target x "
        "the median time of one training step of that method, measured on this "
        "machine in one per-step run (interleaved rounds: baseline, kfac, baseline, ...; the "
        "K-FAC step time averages its refreshes, one every 10 steps). The lockstep "
        "time-to-target run (`--wall lockstep`, the default) was not run: the machine was "
        "shared by several jobs (load 15-20 on 2 cores). Budget "
        + ", ".join(f"{w}: {max_steps[w]} steps" for w in workloads) + "." + prune_txt
        + (f" {args.note}" if args.note else ""),
        "",
        "Per-step time: " + "; ".join(
            f"{w}: " + ", ".join(f"{m} {t:.2f} ms" for m, t in c.items())
            + f" (kfac / {BASELINE[w]} {c['kfac'] / c[BASELINE[w]]:.2f}x)"
            for w, c in cost.items()) + ".",
        "",
        "| workload | target | seed | baseline lr: steps, wall | kfac lr: steps, wall | "
        "wall ratio kfac / baseline | steps ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for w in workloads:
        c = cost[w]
        base = BASELINE[w]
        for tgt, thr in TARGETS[w].items():
            ratios, sratios = [], []
            for s in seeds:
                got = {}
                cells = []
                for m in (base, "kfac"):
                    lr = best_lr(steps, m, w, s, tgt, lrs)
                    if lr is None:
                        cells.append(f"{m}: not reached")
                        continue
                    n = steps[(m, w, lr, s)][0][tgt]
                    got[m] = (n, n * c[m] / 1e3)
                    cells.append(f"{m} {lr:g}: {n}, {got[m][1]:.2f} s")
                r = sr = None
                if len(got) == 2:
                    r, sr = got["kfac"][1] / got[base][1], got["kfac"][0] / got[base][0]
                    ratios.append(r)
                    sratios.append(sr)
                name = f"{'loss <=' if tgt == 'loss' else 'test acc >='} {thr:g}"
                lines.append(f"| {w} | {name} | {s} | {cells[0]} | {cells[1]} | "
                             f"{'—' if r is None else f'{r:.2f}'} | "
                             f"{'—' if sr is None else f'{sr:.2f}'} |")
            if ratios:
                summary.append(f"{w} {name}: median wall ratio {statistics.median(ratios):.2f}"
                               f" (max {max(ratios):.2f}), median steps ratio "
                               f"{statistics.median(sratios):.2f}")
    lines += ["", f"Summary (target: {target_txt(workloads)}): " + "; ".join(summary) + ".", ""]
    lines += ["Steps to each target per lr (median over seeds; `—`: not reached by every "
              "seed):", "", "| workload | method | lr #1 | lr #2 | lr #3 | lr #4 |",
              "|---|---|---|---|---|---|"]
    for w in workloads:
        for m in (BASELINE[w], "kfac"):
            cells = []
            for lr in lrs[m]:
                parts = []
                for tgt in TARGETS[w]:
                    vals = [steps[(m, w, lr, s)][0].get(tgt) for s in seeds]
                    ok = all(v is not None for v in vals)
                    parts.append(f"{tgt} {statistics.median(vals) if ok else '—'}")
                cells.append(f"{lr:g}: " + ", ".join(parts))
            lines.append(f"| {w} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 2 lrs (smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in phase 2")
    ap.add_argument("--jobs", type=int, default=2, help="phase-1 runs at once")
    ap.add_argument("--workloads", nargs="+", default=["mlp", "cnn"], choices=list(MODELS),
                    help="mlp, cnn (default both), transformer (not in the default run: "
                    "about 30x the MLP's cost per step)")
    ap.add_argument("--wall", choices=("lockstep", "derived"), default="lockstep",
                    help="lockstep: time-to-target runs in lockstep (phase 2); derived: "
                    "steps x the median per-step time (interleaved), for a loaded machine")
    ap.add_argument("--note", default="", help="a sentence added to the report's setup")
    ap.add_argument("--prune", action="store_true",
                    help="phase 1: stop a run once it cannot be its seed's best lr")
    ap.add_argument("--steps-log", default=None,
                    help="JSON-lines log of phase-1 runs: finished runs are read from it "
                    "and skipped, new ones appended")
    ap.add_argument("--steps-only", action="store_true",
                    help="run phase 1 only (steps are load independent: it may run on a busy "
                    "machine), appending to --steps-log; a later run reads the log")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.steps_only and not args.steps_log:
        ap.error("--steps-only needs --steps-log (where phase 1's runs are kept)")
    if args.steps_only:  # no fragment: the report comes from a later run reading the log
        report(args)
        return "phase 1 done"
    name = "natural_gradient" if "transformer" not in args.workloads else (
        "natural_gradient_transformer")
    return run_experiment(name, report, args)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
