"""Merging two MNIST-1D models fine-tuned on different digits: Fisher merge vs average.

Setting: one initialization, one base model trained briefly on all ten digits (Adam
lr 3e-3); two copies are fine-tuned from it (Adam lr 1e-3), model A on the digits 0-4
only and model B on 5-9 only, each with the shared 10-way head. Each endpoint forgets
the other half (it stops predicting the other digits). We use the digit split (not two
random halves of the data, which we did not run) because there the endpoints disagree
most, so the merge rule has the most room to matter. Two variants: a shared 10-way head,
and separate heads (each task trains and is scored on its own five logits).

Merges (``natgrad.fisher_weighted_merge``):

* average: the plain mean ``(θ_A + θ_B) / 2`` (the merge with equal Fishers);
* Fisher: ``(F_A θ_A + F_B θ_B) / (F_A + F_B)`` with the exact diagonal Fisher
  (``labels="exact"``) of each model on 1000 training samples of its own digits,
  floor 1e-8;
* Fisher (unit trace): the same with ``normalize=True``.

Scores: test accuracy on the digits 0-4 ("A") and 5-9 ("B"), both as 10-way accuracy
(argmax over all logits) and within the task (argmax over the task's five logits, i.e.
separate heads), and their mean. Mean over seeds.

Run: ``python -m benchmarks.exp_merging`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from benchmarks.workloads import machine_line, mnist1d_cnn, mnist1d_mlp, run_experiment, train
from natgrad import estimate_fisher, fisher_weighted_merge
from natgrad.datasets import load_mnist1d

TASKS = {"A": (0, 1, 2, 3, 4), "B": (5, 6, 7, 8, 9)}
SETTINGS = {"shared 10-way head": False, "separate heads": True}


@torch.no_grad()
def scores(model: torch.nn.Module, tests: dict) -> dict[str, float]:
    """10-way and within-task accuracy on each task's test set."""
    out = {}
    for t, (x, y) in tests.items():
        logits = model(x)
        out[f"{t} 10-way"] = float((logits.argmax(-1) == y).float().mean())
        cls = torch.tensor(TASKS[t])
        within = cls[logits[:, cls].argmax(-1)]
        out[f"{t} task"] = float((within == y).float().mean())
    return out


def adam(lr: float):
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr)


class TaskHead(nn.Module):
    """The model seen through one task's five logits (a separate head)."""

    def __init__(self, model: nn.Module, classes: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("cls", torch.tensor(classes), persistent=False)

    def forward(self, x):
        return self.model(x)[:, self.cls]


def finetune(base, s, classes, heads: bool, seed: int, args):
    """Fine-tune a copy of ``base`` on subset ``s``; return it and its Fisher on ``s``."""
    m = copy.deepcopy(base)
    n = args.fisher_samples
    if heads:  # loss and Fisher over the task's own five logits; labels 0..4
        view, y = TaskHead(m, classes), s.y_train - classes[0]
        train(view, s.x_train, y, epochs=args.ft_epochs, seed=seed + 1, make_opt=adam(args.ft_lr))
        f = estimate_fisher(view.eval(), (s.x_train[:n], y[:n]), labels="exact")
        return m.eval(), {k.removeprefix("model."): v for k, v in f.items()}
    train(m, s.x_train, s.y_train, epochs=args.ft_epochs, seed=seed + 1, make_opt=adam(args.ft_lr))
    return m.eval(), dict(estimate_fisher(m.eval(), (s.x_train[:n], s.y_train[:n]), labels="exact"))


def run_seed(make, data, seed: int, args) -> dict[str, dict[str, dict[str, float]]]:
    torch.manual_seed(seed)
    base = train(
        make(), data.x_train, data.y_train, epochs=args.base_epochs, seed=seed, make_opt=adam(3e-3)
    ).eval()
    subsets = {t: data.subset(c) for t, c in TASKS.items()}
    tests = {t: (s.x_test, s.y_test) for t, s in subsets.items()}
    out = {}
    for setting, heads in SETTINGS.items():
        tuned = {t: finetune(base, s, TASKS[t], heads, seed, args) for t, s in subsets.items()}
        models, fs = [tuned["A"][0], tuned["B"][0]], [tuned["A"][1], tuned["B"][1]]
        ones = [{k: torch.ones_like(v) for k, v in f.items()} for f in fs]
        merged = {
            "base (before fine-tuning)": base,
            "endpoint A (0-4)": models[0],
            "endpoint B (5-9)": models[1],
            "average": fisher_weighted_merge(models, ones),
            "Fisher merge": fisher_weighted_merge(models, fs),
            "Fisher merge (unit trace)": fisher_weighted_merge(models, fs, normalize=True),
        }
        out[setting] = {name: scores(m, tests) for name, m in merged.items()}
    return out


def run(args) -> str:
    data = load_mnist1d()
    lines = [
        "## Merging: Fisher-weighted vs plain average (MNIST-1D, digits 0-4 vs 5-9)",
        "",
        machine_line(),
        "",
        f"Base: Adam lr 3e-3, {args.base_epochs} epochs on all digits. Fine-tune: Adam lr 1e-3, "
        f"{args.ft_epochs} epochs on one half of the digits. Fisher: exact labels, "
        f"{args.fisher_samples} samples of the model's own digits, floor 1e-8. Test accuracy, "
        f"mean over {len(args.seeds)} seeds; '10-way' = argmax over all logits, 'task' = argmax "
        "over the task's own five logits. Shared head: fine-tuning and Fisher use the 10-way "
        "cross-entropy. Separate heads: fine-tuning and Fisher use only the task's five "
        "logits (the other task's head rows are untouched, so their Fisher is zero).",
        "",
    ]
    for name, make in (("MLP", mnist1d_mlp), ("CNN", mnist1d_cnn)):
        t0 = time.time()
        runs = [run_seed(make, data, s, args) for s in args.seeds]
        for setting, heads in SETTINGS.items():
            res = [r[setting] for r in runs]
            methods = list(res[0])
            cols = ["A task", "B task"] if heads else list(res[0][methods[0]])
            means = ["mean task"] if heads else ["mean 10-way", "mean task"]
            lines += [
                f"### {name}, {setting}",
                "",
                "| model | " + " | ".join(cols + means) + " |",
                "|---|" + "---|" * (len(cols) + len(means)),
            ]
            table = {}
            for meth in methods:
                vals = {c: sum(r[meth][c] for r in res) / len(res) for c in res[0][meth]}
                vals["mean 10-way"] = (vals["A 10-way"] + vals["B 10-way"]) / 2
                vals["mean task"] = (vals["A task"] + vals["B task"]) / 2
                table[meth] = {c: round(vals[c], 3) for c in cols + means}
                lines.append(
                    f"| {meth} | "
                    + " | ".join(f"{table[meth][c]:.3f}" for c in cols + means)
                    + " |"
                )
            delta = ", ".join(
                f"{table['Fisher merge'][c] - table['average'][c]:+.3f} ({c})" for c in means
            )
            lines += ["", f"Fisher merge minus average: {delta}.", ""]
            print("\n".join(lines[-len(methods) - 7 :]), flush=True)
        print(f"{name}: {time.time() - t0:.0f}s", flush=True)
    lines.append(
        "The machine was shared with other busy jobs (timings are not reported). Reproduce "
        "with `python -m benchmarks.exp_merging" + (" --quick" if args.quick else "") + "`."
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, fewer epochs (smoke run)")
    args = p.parse_args(argv)
    args.base_epochs = 2 if args.quick else 10
    args.ft_epochs = 1 if args.quick else 5
    args.fisher_samples = 300 if args.quick else 1000
    args.seeds = (0,) if args.quick else (0, 1, 2)
    args.ft_lr = 1e-3
    run_experiment("merging", run, args)


if __name__ == "__main__":
    main()
