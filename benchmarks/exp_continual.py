"""Split MNIST-1D continual learning: EWC with diagonal, K-FAC and EKFAC curvature.

Five tasks, the digit pairs (0,1), (2,3), ..., (8,9); labels are ``y - 2t`` (first or
second digit of the pair). Two scenarios:

* task-incremental: one MLP 40-100-100-10 whose task ``t`` reads only its own logits
  ``2t, 2t+1`` (a masked head; the task identity is known at test time);
* domain-incremental: one MLP 40-100-100-2 with a single shared 2-way head (no task
  identity: the model must answer "first or second digit of the pair" for every pair).

Methods: fine-tuning; EWC with the diagonal Fisher, the K-FAC Fisher and the EKFAC Fisher
(``natgrad.estimate_curvature(kind=...)``, one term per task, ``mode="separate"``); and
online EWC (``mode="online"``, ``F <- gamma F + F_new``, newest anchor) with the diagonal
and the K-FAC Fisher (Kronecker factors folded as documented in ``natgrad.EWC``). Every
Fisher uses the same label source (``--labels``, default ``exact``) on the task's training
split. Every task is trained with the same optimizer and epochs.

Tuning: every EWC method runs every lambda of one log grid (the same grid, the same
number of points) for every seed; the lambda with the best mean (over seeds) average
final accuracy on the validation split (20% of each task's training data, never the
test set) is chosen, and that lambda's test scores are reported, mean ± std over seeds.

Metrics (``R[i, j]``: test accuracy on task j after training task i, T = 5 tasks):
average accuracy ``mean_j R[T-1, j]``; average forgetting
``mean_{j<T-1} (max_{j<=i<T-1} R[i, j] - R[T-1, j])``.

The lambda helper: for each curvature the scale-free ``EWC.suggest_lambda(F, s)`` is
``s * N * P / tr F``; the table reports, per kind and scenario, the scale-free value
``s* = lambda* tr F / (N P)`` of the grid optimum and the helper's lambda at a reference
``s`` fixed before this run (see ``S_REF``), against the grid optimum.

Run: ``python -m benchmarks.exp_continual`` (``--quick`` for a smoke run that writes
nothing; ``--labels empirical`` for the label-source diagnostic, written to its own
fragment).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
from torch import nn

from benchmarks.workloads import load_note, machine_line, mnist1d_mlp, publish
from natgrad import EWC, estimate_curvature
from natgrad.datasets import load_mnist1d

N_TASKS = 5
BATCH = 64
LR = 3e-3
EPOCHS = 5
GAMMA = 0.9
VAL_FRACTION = 0.2
# One grid for every method: 11 points, half a decade apart (a first run with 1-1e4 put
# four domain-incremental optima on its lower edge, so it starts at 0.1).
LAMBDAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4)
# Reference scale-free strength, fixed before this run from benchmarks/exp_damping: there
# lambda * tr F ~ 1e3 protected task A (N = 1993 samples, P = 15,210 parameters), which is
# s = 1e3 / (N P) = 3.3e-5.
S_REF = 3.3e-5

METHODS = (
    ("finetune", "-", "-"),
    ("EWC diag", "diag", "separate"),
    ("EWC K-FAC", "kfac", "separate"),
    ("EWC EKFAC", "ekfac", "separate"),
    ("online EWC diag", "diag", "online"),
    ("online EWC K-FAC", "kfac", "online"),
)
METHOD_KEYS = dict(
    zip(("finetune", "diag", "kfac", "ekfac", "online-diag", "online-kfac"), METHODS, strict=True)
)


class MaskedHead(nn.Module):
    """MLP 40-100-100-10 whose active task ``t`` (attribute ``task``) reads logits 2t, 2t+1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mnist1d_mlp()
        self.task = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 2 * self.task : 2 * self.task + 2]


class SharedHead(nn.Module):
    """MLP 40-100-100-2 with one shared 2-way head (``task`` is ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 2)
        )
        self.task = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


SCENARIOS = {"task-incremental": MaskedHead, "domain-incremental": SharedHead}


def make_tasks():
    """Per task: (train, val, test) batches ``(x, y - 2t)`` with labels 0/1."""
    d = load_mnist1d()
    tasks = []
    for t in range(N_TASKS):
        s = d.subset((2 * t, 2 * t + 1))
        n_val = int(len(s.x_train) * VAL_FRACTION)
        tasks.append(
            (
                (s.x_train[n_val:], s.y_train[n_val:] - 2 * t),
                (s.x_train[:n_val], s.y_train[:n_val] - 2 * t),
                (s.x_test, s.y_test - 2 * t),
            )
        )
    return tasks


def train_task(model, data, epochs, seed, penalty=None):
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model, b):
    return float((model(b[0]).argmax(-1) == b[1]).float().mean())


def run_sequence(tasks, scenario, kind, mode, lam, seed, epochs, labels):
    """Train the tasks in order; return (R_val, R_test, [(N, P, tr F) per consolidated task])."""
    torch.manual_seed(seed)
    model = SCENARIOS[scenario]()
    ewc = None if kind == "-" else EWC(model, lam=lam, mode=mode, gamma=GAMMA)
    R_val, R_test = np.zeros((N_TASKS, N_TASKS)), np.zeros((N_TASKS, N_TASKS))
    stats = []
    for t, (train, _, _) in enumerate(tasks):
        model.task = t
        pen = ewc if ewc is not None and ewc.num_tasks > 0 else None
        train_task(model, train, epochs, seed * 10 + t, pen)
        if ewc is not None and t < N_TASKS - 1:
            curv = estimate_curvature(model, train, kind=kind, labels=labels)
            diag = curv.diagonal()
            trace = sum(float(v.double().sum()) for v in diag.values())
            stats.append((curv.n_samples, sum(v.numel() for v in diag.values()), trace))
            ewc.consolidate(curv)
        for j, (_, val, test) in enumerate(tasks):
            model.task = j
            R_val[t, j], R_test[t, j] = accuracy(model, val), accuracy(model, test)
    return R_val, R_test, stats


def summarize(R):
    """(average final accuracy, average forgetting) of an accuracy matrix."""
    T = R.shape[0]
    forget = np.mean([R[j : T - 1, j].max() - R[-1, j] for j in range(T - 1)])
    return float(R[-1].mean()), float(forget)


def run_scenario(tasks, scenario, seeds, epochs, lambdas, labels, methods):
    """Per method: the grid's validation scores, the chosen lambda and its test scores."""
    rows = []
    for name, kind, mode in methods:
        t0 = time.time()
        grid = (0.0,) if kind == "-" else lambdas
        runs = {
            lam: [run_sequence(tasks, scenario, kind, mode, lam, s, epochs, labels) for s in seeds]
            for lam in grid
        }
        val_both = {lam: np.mean([summarize(r[0]) for r in rs], axis=0) for lam, rs in runs.items()}
        val = {lam: float(v[0]) for lam, v in val_both.items()}
        best = max(val.values())
        lam = min(k for k, v in val.items() if v == best)  # ties: the weaker penalty
        test = np.array([summarize(r[1]) for r in runs[lam]])
        stats = [st for r in runs[lam] for st in r[2]]
        rows.append(
            {
                "name": name,
                "kind": kind,
                "mode": mode,
                "lam": lam,
                "val": val,
                "val_forget": {lam: float(v[1]) for lam, v in val_both.items()},
                "test": test,
                "stats": stats,
                "secs": time.time() - t0,
            }
        )
        print(
            f"  {scenario} {name}: lambda={lam:g} val={best:.3f} acc={test[:, 0].mean():.3f} "
            f"forget={test[:, 1].mean():.3f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    return rows


def nearest(grid, x):
    """The grid point nearest to ``x`` on a log scale."""
    return min(grid, key=lambda g: abs(math.log(g) - math.log(x)))


def report(results, seeds, epochs, lambdas, labels, elapsed, argv_tail, load):
    lines = [
        f"## Continual learning: Split MNIST-1D, EWC on diagonal, K-FAC and EKFAC curvature"
        f"{'' if labels == 'exact' else f' ({labels} labels)'}",
        "",
        machine_line(),
        "",
        f"{load}. Command: `nice python -m benchmarks.exp_continual{argv_tail}` "
        f"({elapsed:.0f} s).",
        "",
        "Five tasks, the digit pairs (0,1), (2,3), ..., (8,9), label = first / second digit "
        "of the pair. Task-incremental: MLP 40-100-100-10, task t reads its own logits 2t, "
        "2t+1. Domain-incremental: MLP 40-100-100-2 with one shared 2-way head, no task "
        f"identity. Every task: Adam lr {LR}, batch {BATCH}, {epochs} epochs; "
        f"{int(VAL_FRACTION * 100)}% of each task's training data held out for validation. "
        f"Fishers: `natgrad.estimate_curvature(kind=..., labels=\"{labels}\")` on the task's "
        f"training split after the task; online EWC uses gamma = {GAMMA}. Every EWC method ran "
        f"the same grid of {len(lambdas)} λ values ({', '.join(f'{x:g}' for x in lambdas)}) "
        f"for every seed ({', '.join(map(str, seeds))}); λ* is the one with the best mean "
        "validation average accuracy, and the table gives its test scores, mean ± std over "
        "the seeds. Average forgetting: mean over tasks 1-4 of (best accuracy on the task "
        "after any earlier step) - (final accuracy on it).",
    ]
    for scenario, rows in results.items():
        lines += [
            "",
            f"### {scenario}",
            "",
            "| method | λ* | avg accuracy | avg forgetting | time / method, all λ (s) |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            sc = r["test"]
            lines.append(
                f"| {r['name']} | {r['lam']:g} | {sc[:, 0].mean():.3f} ± {sc[:, 0].std():.3f} "
                f"| {sc[:, 1].mean():.3f} ± {sc[:, 1].std():.3f} | {r['secs']:.0f} |"
            )
        lines += [
            "",
            "Validation average accuracy / average forgetting (means over seeds) over the "
            "grid (bold: λ*):",
            "",
            "| method | " + " | ".join(f"λ={x:g}" for x in lambdas) + " |",
            "|---|" + "---|" * len(lambdas),
        ]
        for r in rows:
            if r["kind"] == "-":
                continue
            lines.append(
                f"| {r['name']} | "
                + " | ".join(
                    f"**{r['val'][x]:.3f} / {r['val_forget'][x]:.3f}**"
                    if x == r["lam"]
                    else f"{r['val'][x]:.3f} / {r['val_forget'][x]:.3f}"
                    for x in lambdas
                )
                + " |"
            )
    lines += [
        "",
        "### The λ helper against the grid optimum",
        "",
        "`EWC.suggest_lambda(F, s)` = s·N·P / tr F per consolidated task (N samples, P "
        "parameters, tr F the trace of that task's curvature). Columns: the mean tr F and the "
        "geometric mean of N·P / tr F over the consolidated tasks and seeds at λ*; "
        "s* = λ*·tr F / (N·P), the grid optimum in the helper's units; the helper's λ at "
        f"the reference s = {S_REF:g} (fixed before this run from `exp_damping`, where "
        "λ·tr F ≈ 10³ protected task A with N·P = 1993·15,210); the validation average "
        "accuracy at the grid point nearest to the helper's λ against that at λ*.",
        "",
        "| scenario | method | mean tr F | N·P / tr F | λ* | s* | helper λ (s = "
        f"{S_REF:g}) | helper λ / λ* | val acc: helper's grid point / λ* |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, rows in results.items():
        for r in rows:
            if r["kind"] == "-":
                continue
            st = np.array(r["stats"], dtype=float)
            unit = float(np.exp(np.mean(np.log(st[:, 0] * st[:, 1] / st[:, 2]))))
            helper = S_REF * unit
            near = nearest(lambdas, helper)
            lines.append(
                f"| {scenario} | {r['name']} | {st[:, 2].mean():.3g} | {unit:.3g} | "
                f"{r['lam']:g} | {r['lam'] / unit:.2g} | {helper:.3g} | "
                f"{helper / r['lam']:.2g} | {r['val'][near]:.3f} (λ={near:g}) / "
                f"{r['val'][r['lam']]:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 3 lambdas; no file")
    p.add_argument("--labels", default="exact", choices=("exact", "mc", "empirical"))
    p.add_argument(
        "--methods",
        default=",".join(METHOD_KEYS),
        help=f"comma-separated subset of {','.join(METHOD_KEYS)}",
    )
    args = p.parse_args(argv)
    keys = args.methods.split(",")
    unknown = sorted(set(keys) - set(METHOD_KEYS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHOD_KEYS)}")
    methods = [m for k, m in METHOD_KEYS.items() if k in keys]
    torch.set_num_threads(int(os.environ.get("NATGRAD_BENCH_THREADS", "1")))
    seeds = (0,) if args.quick else (0, 1, 2)
    epochs = 2 if args.quick else EPOCHS
    lambdas = (10.0, 300.0, 1e4) if args.quick else LAMBDAS
    t0, load = time.time(), load_note()
    tasks = make_tasks()
    results = {}
    for scenario in SCENARIOS:
        print(f"{scenario}:", flush=True)
        results[scenario] = run_scenario(tasks, scenario, seeds, epochs, lambdas, args.labels, methods)
    tail = (" --quick" if args.quick else "") + (
        "" if args.labels == "exact" else f" --labels {args.labels}"
    )
    if len(methods) < len(METHODS):
        tail += f" --methods {','.join(k for k in METHOD_KEYS if k in keys)}"
    text = report(results, seeds, epochs, lambdas, args.labels, time.time() - t0, tail, load)
    publish("continual" if args.labels == "exact" else f"continual_{args.labels}", text,
            args.quick)
    return text


if __name__ == "__main__":
    main()
